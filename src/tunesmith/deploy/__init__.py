"""Shipping what was tuned: export (adapter, merged HF, GGUF + Ollama Modelfile, prompt), the
OpenAI-compatible server with many adapters on one base, and batch generation."""
