"""The model: the block registry, the block-string language, the state beside the residual stream, model
assembly and the shape trace. Import the modules themselves (`micro_arch.model.registry`, ...)."""
