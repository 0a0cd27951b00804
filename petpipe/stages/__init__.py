"""One module per DVC stage, each with Inputs, Outputs and run(params, inputs, outputs)."""
