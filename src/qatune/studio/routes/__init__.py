"""The studio's API, one router per page or concern: files, data, train, eval, export, chat, jobs.

Each router's handlers take the app's shared `qatune.studio.state.Studio` as a parameter and start
their jobs with the command table's `qatune.commands.command_line`.
"""
