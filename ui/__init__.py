"""The Gradio dashboard and API; talks to core.service only, never to a provider SDK."""
