"""qatune studio: the whole road in the browser over a workspace folder, each step the `qatune` command it shows.

`app.create_app(Workspace(dir))` is the FastAPI app; `qatune studio` runs it (`app.serve_studio`).
"""
