"""The table of `qatune` commands: one declarative entry per command, read by the CLI and the studio.

Each `Command` names itself as typed after `qatune` ("train", "data check"), its positionals, its flags
(each with the config key it stands for: the one override path) and the function that runs it, as
`module:function` imported only when the command runs (so `qatune --help` stays fast). `qatune.cli`
builds its parser from `COMMANDS`; the studio asks `command_line` for the arguments of a job, so what a
page starts is a command the CLI reads back to the same arguments. A flag with a fixed set of values
names the config key whose schema choices it offers (`choices_of`); nothing here retypes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

OVERRIDES_HELP = "section.key=value overrides, e.g. data.max_length=512 model=path/to/model"
CONFIG_ARGS = "[CONFIG] [KEY=VALUE]"


@dataclass(frozen=True)
class Positional:
    name: str  # the attribute the parsed value lands on
    help: str
    metavar: str | None = None
    nargs: str | None = None  # "*": any number


@dataclass(frozen=True)
class Flag:
    name: str  # as typed: "--out"
    help: str
    key: str | None = None  # the config key the value stands for (`qatune.cli.common.config_from`)
    choices_of: str | None = None  # the config key whose schema choices (a Literal) it offers; give a metavar
    metavar: str | tuple[str, ...] | None = None
    action: str | None = None  # "append" (repeatable) or "store_true"
    type: type | None = None
    nargs: int | None = None
    default: Any = None

    @property
    def dest(self) -> str:
        """The attribute the parsed value lands on, and the keyword `command_line` takes it as."""
        return self.name.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Command:
    name: str  # as typed after `qatune`: a word, or a group and a word ("data check")
    summary: str
    run: str  # `module:function` called with the parsed arguments
    description: str | None = None  # kept as written when it holds line breaks
    positionals: tuple[Positional, ...] = ()
    flags: tuple[Flag, ...] = ()

    @property
    def flag_keys(self) -> dict[str, str]:
        """Flag attribute -> the config key it stands for."""
        return {flag.dest: flag.key for flag in self.flags if flag.key}


def config_args(metavar: str = CONFIG_ARGS, before: str = "") -> Positional:
    """The free positionals of a command that reads a config: CONFIG, `key=value` overrides, and what it names."""
    return Positional("args", before + OVERRIDES_HELP, metavar, "*")


def model_flag(role: str = "model") -> Flag:
    """--model, the model.name_or_path of a command, described by what the model does there."""
    return Flag("--model", f"{role}: default, a Hugging Face folder, a .gguf file or a hub id", "model.name_or_path")


ADAPTER_FLAG = Flag("--adapter", "LoRA/prefix adapter folder (a qatune train output) to put on --model")
SESSION_FLAGS = (model_flag(), ADAPTER_FLAG, Flag("--system", "system prompt"))  # chat and generate


def _generating_flags(section: str, role: str, *own: Flag, prompt: bool = True) -> tuple[Flag, ...]:
    """What every command that writes data with a model shares: the model, its output file and prompt, `own`
    flags, --force, and an OpenAI-compatible endpoint instead of the local model."""
    return (model_flag(role), Flag("--out", f"output .jsonl ({section}.output)", f"{section}.output", metavar="FILE"),
            *([Flag("--prompt", f"prompt template file ({section}.prompt)", f"{section}.prompt", metavar="FILE")]
              if prompt else []),
            *own,
            Flag("--force", "replace an existing output file", f"{section}.overwrite", action="store_true"),
            Flag("--endpoint", "an OpenAI-compatible API (…/v1) writes instead of the local model (endpoint.url)",
                 "endpoint.url", metavar="URL"),
            Flag("--endpoint-model", "the model name the endpoint serves (endpoint.model)", "endpoint.model",
                 metavar="NAME"))


GROUPS = {"config": "show the resolved config or its reference", "data": "prepare, check or grow training data"}

DECODING = ("Decoding follows serve.decoding: temperature (0.7), top_p (0.9), repetition_penalty, max_new_tokens; "
            "e.g. serve.decoding.temperature=0 for greedy answers.")

_CONFIG_COMMANDS = (
    Command("config show", "print the resolved config: FILE plus overrides", "qatune.cli.config:cmd_config_show",
            positionals=(config_args("[FILE] [KEY=VALUE]"),)),
    Command("config docs", "print the config reference (Markdown) generated from the schema",
            "qatune.cli.config:cmd_config_docs"),
)

_DATA_COMMANDS = (
    Command(
        "data prepare", "read, clean, split, tokenize and write the dataset with its report",
        "qatune.cli.data:cmd_data_prepare",
        "Writes data.output_dir/: dataset/ (Arrow), data_report.json, dropped.jsonl, token_lengths.png, "
        "chat_template.jinja, config.yaml.", (config_args(),)),
    Command(
        "data check", "validate a data file or folder without writing; list every problem",
        "qatune.cli.data:cmd_data_check",
        positionals=(Positional("file", "data file, folder, or LLaMA-Factory dataset_info.json (with --dataset)"),),
        flags=(Flag("--format", "record format; auto detects it from the first record's keys",
                    choices_of="data.sources.format", metavar="FORMAT", default="auto"),
               Flag("--dataset", "names in a LLaMA-Factory registry, comma-separated"),
               Flag("--encoding", "text encoding, e.g. gb18030", default="utf-8"))),
    Command(
        "data from-docs", "generate Q&A pairs citing their source from .md/.txt/.pdf documents with a model",
        "qatune.cli.data:cmd_data_from_docs",
        "Splits the documents by headings and paragraphs, asks the model (--model, default: the embedded one) for "
        "Q&A pairs per chunk through a prompt you can replace (--prompt), drops duplicates of the existing data "
        "(--against, default data.sources) and writes a qa-format JSONL whose records carry `source` {file, section, "
        "lines}, plus FILE.report.json and FILE.dropped.jsonl.",
        (config_args("DIR [CONFIG] [KEY=VALUE]", "folder (or file) of .md, .txt and .pdf documents, then "),),
        _generating_flags("from_docs", "generating model",
                          Flag("--against", "existing data to deduplicate against", "from_docs.against",
                               metavar="FILE", action="append"))),
    Command(
        "data augment", "add question paraphrases generated by a model, deduplicated, with provenance",
        "qatune.cli.data:cmd_data_augment",
        "Asks the model for paraphrases of every single-turn question of the data (--data, default data.sources), "
        "keeps at most --per-question new ones that duplicate neither an original question nor each other, and "
        "writes them with the original answer and a `provenance` field to a new qa-format JSONL, plus "
        "FILE.report.json and FILE.dropped.jsonl. Add it to data.sources beside the original data.",
        (config_args(),),
        _generating_flags(
            "augment", "generating model",
            Flag("--data", "dataset to paraphrase (repeatable)", "data.sources", metavar="FILE", action="append"),
            Flag("--per-question", "paraphrases kept per question at most", "augment.per_question", metavar="N",
                 type=int))),
    Command(
        "data answer", "a teacher (the model, or an OpenAI-compatible endpoint) answers a question list",
        "qatune.cli.data:cmd_data_answer",
        "Sequence-level distillation: every question of QUESTIONS (.txt, one a line, or .jsonl with a `question` "
        "field) is answered by the model (--model) or by an OpenAI-compatible endpoint (--endpoint URL "
        "--endpoint-model NAME, key from the variable endpoint.api_key_env names), and written as a qa JSONL with "
        "`provenance` {teacher, prompt, source}, plus FILE.report.json and FILE.dropped.jsonl. A stopped run "
        "resumes: answered questions are skipped.",
        (config_args("QUESTIONS [CONFIG] [KEY=VALUE]", "the question list, then "),),
        _generating_flags("answer", "answering model", prompt=False)),
    Command(
        "data feedback", "experts' review-sheet scores -> DPO pairs, KTO examples and SFT corrections",
        "qatune.cli.data:cmd_data_feedback",
        "Reads filled review sheets (several sheets, or a `reviewer` column, for several reviewers) and writes to "
        "feedback.output_dir: dpo.jsonl (per question the best- against the worst-scored answer, when their mean "
        "scores differ by feedback.margin), kto.jsonl (desirable at feedback.desirable_at or above, undesirable at "
        "feedback.undesirable_at or below), sft.jsonl (the filled `correction` column), unused.jsonl (every row "
        "left out, with its reason) and feedback_report.json (counts, reviewer agreement). Every record carries "
        "its provenance: sheet, row, reviewer, scores.",
        (config_args("SHEET.csv [SHEET.csv ...] [CONFIG] [KEY=VALUE]", "the filled review sheets, then "),),
        (Flag("--out", "output folder (feedback.output_dir)", "feedback.output_dir", metavar="DIR"),
         Flag("--force", "replace the files an earlier run wrote there", "feedback.overwrite", action="store_true"))),
)

_TRAIN_COMMANDS = (
    Command(
        "train", "fine-tune a model on your data (lora, qlora, full, freeze, prefix)", "qatune.cli.train:cmd_train",
        "Prepares the data (or reuses it when unchanged), trains, and writes train.output_dir/: adapter or weights "
        "(safetensors), tokenizer, config.yaml, train_report.json, loss_curve.png, checkpoints and TensorBoard logs. "
        "Ctrl-C saves a checkpoint; train.resume=true continues.",
        (config_args(),),
        (model_flag(),
         Flag("--data", "training data file or folder (repeatable)", "data.sources", metavar="FILE", action="append"),
         Flag("--nproc", "train with N data-parallel processes on this machine (torchrun; see train.distributed)",
              metavar="N", type=int, default=1))),
    Command(
        "tune", "search learning rate, LoRA rank/alpha, epochs and warm-up with Optuna", "qatune.cli.train:cmd_tune",
        "qatune tune CONFIG --trials N [KEY=VALUE]\n\nEach trial trains in tune.output_dir/trial-N and is pruned "
        "when its eval loss trails earlier trials. The study is kept in tune.output_dir/study.db: run the same "
        "command again to resume. Writes best_config.yaml (train it with `qatune train`), tune_summary.json and "
        "optimization_history.png.",
        (config_args(),),
        (model_flag(), Flag("--trials", "trials the study should hold (tune.trials)", "tune.trials", metavar="N",
                            type=int))),
    Command(
        "eval", "evaluate a model, or compare base and fine-tuned (metrics, forgetting check, reports)",
        "qatune.cli.evaluate:cmd_eval",
        "qatune eval [CONFIG] [KEY=VALUE] --model M [--adapter A] --data FILE [--general FILE]\n"
        "qatune eval [CONFIG] --compare BASE TUNED --data FILE [--general FILE] [--gate]\n"
        "qatune eval summarize review_sheet.csv\n\n"
        "Writes eval.output_dir/: eval_report.json/.md/.html, predictions.<model>.jsonl and review_sheet.csv "
        "(fill its score column 1-5, then run `qatune eval summarize`).",
        (config_args(),),
        (model_flag(), ADAPTER_FLAG,
         Flag("--compare", "evaluate BASE and TUNED (an adapter folder on BASE, or a whole model) side by side",
              metavar=("BASE", "TUNED"), nargs=2),
         Flag("--data", "domain evaluation set (repeatable)", "eval.data", metavar="FILE", action="append"),
         Flag("--general", "general multiple-choice set for the forgetting check (repeatable)", "eval.general",
              metavar="FILE", action="append"),
         Flag("--out", "output folder (eval.output_dir)", "eval.output_dir", metavar="DIR"),
         Flag("--gate", "with --compare: exit 3, with the reason, when TUNED is worse than BASE beyond "
              "eval.gate.metrics' margins or forgets (eval.gate)", "eval.gate.enabled", action="store_true"))),
)

_USE_COMMANDS = (
    Command(
        "export", "merge an adapter, write a Hugging Face folder, GGUF (llama.cpp, Ollama) or a quantized copy",
        "qatune.cli.deploy:cmd_export",
        "qatune export --model M --adapter A --out DIR [--gguf TYPE] [--gguf-adapter] [--quantize KIND]\n\n"
        "Writes DIR/: merged safetensors (sharded), config, tokenizer with its chat template, generation config; "
        "model-<type>.gguf and an Ollama Modelfile (checked in llama.cpp where installed: greedy answers, "
        "perplexity); adapter.gguf, base-<type>.gguf and Modelfile.adapter; int8/ or bnb-*/ quantized copies; "
        "export_report.json with a greedy-answer check of every form against base + adapter.",
        (config_args(),),
        (model_flag(),
         Flag("--adapter", "LoRA adapter folder to merge (a qatune train output)", "export.adapter"),
         Flag("--out", "output folder (export.output_dir); must be empty", "export.output_dir", metavar="DIR"),
         Flag("--gguf", "also write a GGUF file and an Ollama Modelfile (k-quants: pip install 'qatune[llamacpp]')",
              "export.gguf", choices_of="export.gguf", metavar="TYPE"),
         Flag("--gguf-adapter", "also write the LoRA adapter as a GGUF adapter, its base as GGUF, and "
              "Modelfile.adapter", "export.gguf_adapter", action="store_true"),
         Flag("--quantize", "also write a quantized copy (int8: torchao; bnb-*: bitsandbytes, CUDA or CPU)",
              "export.quantize", choices_of="export.quantize", metavar="KIND"),
         Flag("--force", "replace a non-empty output folder", "export.overwrite", action="store_true"))),
    Command("chat", "talk to a model in the terminal (streaming, with history)", "qatune.cli.deploy:cmd_chat",
            f"Commands: /reset starts a new conversation, /exit leaves.\n\n{DECODING}", (config_args(),),
            SESSION_FLAGS),
    Command("generate", "answer one question and exit", "qatune.cli.deploy:cmd_generate", DECODING,
            (config_args(f"{CONFIG_ARGS} QUESTION"),), SESSION_FLAGS),
    Command(
        "serve", "serve the model and its adapters over HTTP (OpenAI-compatible API, chat page, metrics)",
        "qatune.cli.deploy:cmd_serve",
        "qatune serve [CONFIG] --model M [--adapter NAME=FOLDER ...] [--host H] [--port P] [--engine NAME]\n\n"
        "Routes: POST /v1/chat/completions, /v1/completions (stream over SSE), GET /v1/models, POST /answer, "
        "GET /health, GET /metrics (Prometheus), GET / (chat page). Concurrent requests are batched together "
        "(serve.max_batch_size); serve.api_key (or env QATUNE_API_KEY) requires a Bearer key.",
        (config_args(),),
        (model_flag(),
         Flag("--adapter", "LoRA adapter served as model NAME on the one base model (repeatable)", "serve.adapters",
              metavar="NAME=FOLDER", action="append"),
         Flag("--host", "bind address (serve.host, default 127.0.0.1)", "serve.host"),
         Flag("--port", "TCP port (serve.port, default 8000)", "serve.port", type=int),
         Flag("--engine", "serve.engine: auto (default), hf (CPU or GPU), llamacpp (GGUF on the CPU) or vllm (a CUDA "
              "GPU, or the CPU with vLLM's CPU build: make vllm)", "serve.engine", choices_of="serve.engine",
              metavar="NAME"))),
    Command(
        "studio", "the whole road in the browser: data, train, evaluate, chat, export over a workspace folder",
        "qatune.cli.deploy:cmd_studio",
        "Pages over a workspace folder; every step runs the qatune command it shows (kept in WORKSPACE/.studio/jobs/ "
        "with its log), and runs are folders in WORKSPACE/runs/.",
        flags=(Flag("--workspace", "folder of data files, runs and exports (default: here)", default="."),
               Flag("--host", "bind address (default 127.0.0.1: this machine only)", default="127.0.0.1"),
               Flag("--port", "TCP port (default 7860)", type=int, default=7860),
               Flag("--token", "require this token (open the page with ?token=...; env QATUNE_STUDIO_TOKEN)"))),
)

# In this order in `qatune --help`.
COMMANDS: dict[str, Command] = {c.name: c for c in (*_CONFIG_COMMANDS, *_DATA_COMMANDS, *_TRAIN_COMMANDS,
                                                     *_USE_COMMANDS)}

FlagValue = str | int | bool | Sequence[str] | None


def command_line(name: str, *positionals: str, overrides: Sequence[str] = (), **flags: FlagValue) -> list[str]:
    """The arguments after `qatune` that run command `name` ("train", "data check") with these positionals
    (CONFIG, a file...), flags by attribute (`out="runs/r"`, `data=["a.jsonl"]`, `force=True`; None and False are
    left out) and `key=value` overrides: the command's words, the positionals, the flags in the table's order,
    then the overrides."""
    command = COMMANDS[name]
    free = any(p.nargs == "*" for p in command.positionals)  # CONFIG and overrides, or a list of files
    if not free and (overrides or len(positionals) > len(command.positionals)):
        raise TypeError(f"qatune {name} takes {len(command.positionals)} positional(s) and no overrides")
    unknown = set(flags) - {flag.dest for flag in command.flags}
    if unknown:
        raise TypeError(f"qatune {name} has no flag for {', '.join(sorted(unknown))}")
    argv = [*name.split(), *positionals]
    for flag in command.flags:
        value = flags.get(flag.dest)
        if value is None or value is False:
            continue
        if flag.action == "store_true":
            argv.append(flag.name)
        elif flag.action == "append":
            argv += [part for item in value for part in (flag.name, str(item))]  # type: ignore[union-attr]
        elif flag.nargs:
            argv += [flag.name, *map(str, value)]  # type: ignore[arg-type]
        else:
            argv += [flag.name, str(value)]
    return argv + list(overrides)
