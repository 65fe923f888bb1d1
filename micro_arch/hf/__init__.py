"""Hugging Face interop: start a run from existing weights (`model.init_from`), export a run as a
transformers folder (`micro-arch export`), and the layout tables that decide which models map.

transformers is imported lazily, only by export and by reading a Hugging Face folder.
"""
