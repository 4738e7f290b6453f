"""Training data written by a model: Q&A pairs from documents (`from_docs`) and question paraphrases
(`augment`). A stage above inference: it reads documents and data through `qatune.data` and generates
through `qatune.infer`; `qatune.data` never imports it."""
