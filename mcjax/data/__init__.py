"""Data layer: corpora (`corpus`), tokenizer (`tokenizer`), prep to Arrow (`prep`), input pipeline (`pipeline`)."""
