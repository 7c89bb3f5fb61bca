"""HTTP and control: the FastAPI app, OpenAI routes, proxy, controller, policies, reaper, CLI."""

__version__ = "0.1.0"
