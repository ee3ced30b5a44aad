"""Experiments (many runs): sweeps and their launchers (local, Slurm), reports and tables, plots, the two-stage
search -> final pipeline, decision export, the published teachers' scores and the demo. Imports the engine, which
never imports it."""
