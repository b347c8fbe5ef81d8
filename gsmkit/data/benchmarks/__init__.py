"""Public benchmarks as `{prompt, response, metadata}` rows for `gsmkit eval ppl` (`convert-benchmarks`).

In: a folder with one subfolder per benchmark. Out: one stratified, seeded, decontaminated JSONL.
The seam: `readers` (one reader per benchmark, `Example`), `sampling` (stratified seeded sampling),
`decontamination` (training questions out), `conversion` (`ConvertSettings`, `convert_benchmarks`: the
three in order, the summary and the manifest). Import from the package.
"""

from gsmkit.data.benchmarks.conversion import ConvertSettings, convert_benchmarks, split_benchmarks
from gsmkit.data.benchmarks.decontamination import decontaminate, load_exclusions
from gsmkit.data.benchmarks.readers import (
    BENCHMARKS,
    GPQA_COLUMNS,
    GPQA_FILES,
    MMLU_TECHNICAL,
    READERS,
    Example,
    read_benchmark,
    read_drop,
    read_gpqa,
    read_gsm8k,
    read_humaneval,
    read_math,
    read_math500,
    read_mgsm,
    read_mmlu,
)
from gsmkit.data.benchmarks.sampling import DIFFICULTY_ORDER, allocate, sample_examples

__all__ = [
    "BENCHMARKS", "DIFFICULTY_ORDER", "GPQA_COLUMNS", "GPQA_FILES", "MMLU_TECHNICAL", "READERS",
    "ConvertSettings", "Example", "allocate", "convert_benchmarks", "decontaminate", "load_exclusions",
    "read_benchmark", "read_drop", "read_gpqa", "read_gsm8k", "read_humaneval", "read_math", "read_math500",
    "read_mgsm", "read_mmlu", "sample_examples", "split_benchmarks",
]
