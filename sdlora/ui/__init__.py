"""`sdlora ui`: the browser page (FastAPI + one static HTML/JS page); it calls the API the CLI calls."""
