"""Serving half: settings, model resolution, backends, history handling and the Gradio UI."""
