"""What a finished run or sweep shows: `gendd-report` (report.py; tables in report_table.py, probe
columns in report_probes.py, pictures in plots.py), our numbers beside the published ones
(published.py, published_recipes.yaml), and what the student took from its teacher (`probes/`:
gendd-probe and the `probe` stage)."""
