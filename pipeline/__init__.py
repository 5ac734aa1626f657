"""The pipeline stage: data_gen -> train -> eval in one run folder."""
