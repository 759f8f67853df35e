"""Generation stage: load a diffusion model (``models``), build offline tiny ones (``tiny``), and generate a
prompt suite into a run folder (``runner.generate_run``)."""
