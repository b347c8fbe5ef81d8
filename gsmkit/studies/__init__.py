"""Studies: what users run with gsmkit's commands, summarised and compared with their uncertainty.

`runs` reads any gsmkit output folder (manifest + metrics); `report` joins evaluations to the training runs
whose adapters they used and writes summary.csv / report.md; `thresholds` turns `--require` and
`--baseline` into checks (exit 3); `predictions` and `compare` pair two evaluations problem by problem;
`bench` certifies compressed LoRA variants against a probe adapter across seeds.
"""
