def model_card(model, meta, config, run_dir=None):
    return "# stub\n"
