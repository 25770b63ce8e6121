"""Tasks (`--task`): what to ask, how to score it, and what to train on when no data is given.

A task bundles
- the prompt: an optional system prompt and a user template with a "{query}" slot, one for
  training (asks for the R1 layout <think>...</think><answer>...</answer>) and one for
  evaluation (for OCR: asks for the text only);
- `default_query`, used when a sample has no query (the OCR folder format has only labels);
- reward specs ("name:weight,..." as parsed by rewards.registry) for training and evaluation;
- optionally built-in synthetic data, generated once per cache folder and reused.

Templates are filled with `str.replace("{query}", query)`, not `str.format`, so a template
may contain other braces (\\boxed{}) and a query may contain anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data import synthetic_arith, synthetic_count, synthetic_ocr
from data.cache import build_once
from data.sample import DataError, Sample

QUERY_SLOT = "{query}"
SPLITS = ("train", "eval")
_COMPLETE = "COMPLETE"  # marker file in a finished cache folder; holds the data file's name

Generator = Callable[[Path, int, int, str], Path]  # (out_dir, n, seed, split) -> data file


@dataclass(frozen=True)
class SyntheticData:
    """Built-in data of one task: a generator and the (n, seed) of each split.

    `version` is part of the cache folder name: bump it when the generator's output changes,
    so stale caches are not reused.
    """

    generator: Generator
    version: int
    train: tuple[int, int]  # (n, seed)
    eval: tuple[int, int]

    def build(self, cache_dir: Path, task: str, split: str) -> Path:
        n, seed = self.train if split == "train" else self.eval
        folder = Path(cache_dir) / f"{task}-{split}-n{n}-seed{seed}-v{self.version}"

        def write(out: Path) -> None:
            data_file = self.generator(out, n, seed, split)
            (out / _COMPLETE).write_text(data_file.relative_to(out).as_posix(), encoding="utf-8")

        build_once(folder, write)  # atomic: torchrun ranks may race, a crash leaves nothing
        return folder / (folder / _COMPLETE).read_text(encoding="utf-8").strip()


@dataclass(frozen=True)
class Task:
    """One task: prompts, reward specs and (optional) built-in data."""

    name: str
    system_prompt: str | None
    train_template: str
    eval_template: str
    default_query: str
    default_rewards: str
    eval_rewards: str
    description: str = ""
    builtin: SyntheticData | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for template in (self.train_template, self.eval_template):
            if QUERY_SLOT not in template:
                raise ValueError(f"task {self.name!r}: template {template!r} has no {QUERY_SLOT}")

    def prompt_text(self, sample: Sample, *, evaluation: bool = False) -> str:
        """The filled user template; DataError if the sample and the task both lack a query."""
        query = sample.query or self.default_query
        if not query:
            raise DataError(
                f"{sample.where}: empty query, and task {self.name!r} has no default query"
            )
        template = self.eval_template if evaluation else self.train_template
        return template.replace(QUERY_SLOT, query)

    def messages(self, sample: Sample, *, evaluation: bool = False) -> list[dict[str, Any]]:
        """Qwen-style chat messages: [system?, user], the user content = images then text.

        [{"role": "system", "content": str},                       (when the task has one)
         {"role": "user", "content": [{"type": "image"}, ..., {"type": "text", "text": str}]}]
        The image entries are placeholders, in the order of sample.images.
        """
        content: list[dict[str, Any]] = [{"type": "image"} for _ in sample.images]
        content.append({"type": "text", "text": self.prompt_text(sample, evaluation=evaluation)})
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": content})
        return messages

    def default_data(self, cache_dir: Path, split: str = "train") -> Path:
        """Path of the built-in data file for `split` ("train" or "eval"), built on first use.

        Raises DataError when the task has no built-in data (the user must pass --data).
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if self.builtin is None:
            raise DataError(
                f"--data: task {self.name!r} has no built-in data; pass a data file or folder "
                "with --data (formats: docs/data_formats.md)"
            )
        return self.builtin.build(Path(cache_dir), self.name, split)


# The R1 layout, asked in the system prompt by the English tasks and in the user turn by OCR
# (the ms-swift OCR recipe puts everything in the user turn).
THINK_ANSWER_SYSTEM = (
    "You are a helpful assistant. First think the problem through inside <think> </think> "
    "tags, then write only the final answer inside <answer> </answer> tags."
)

OCR = Task(
    name="ocr",
    system_prompt=None,
    train_template=(
        QUERY_SLOT + "\n请先在<think></think>标签中写下你的思考过程，"
        "然后把识别出的文字原样写在<answer></answer>标签中。"
    ),
    eval_template=QUERY_SLOT + "\n只输出图片中的文字内容，不要输出任何其他内容。",
    default_query=synthetic_ocr.OCR_QUERY,
    default_rewards="ocr:1.0,format:0.5",
    eval_rewards="ocr:1.0",
    description="read the text in an image (built-in: synthetic Chinese text lines)",
    builtin=SyntheticData(
        synthetic_ocr.generate_ocr_dataset,
        version=synthetic_ocr.GENERATOR_VERSION,
        train=(256, 1),
        eval=(64, 2),
    ),
)

MATH = Task(
    name="math",
    system_prompt=THINK_ANSWER_SYSTEM,
    train_template=QUERY_SLOT,
    eval_template=QUERY_SLOT,
    default_query="Solve the problem shown in the image.",
    default_rewards="math:1.0,format:0.5",
    eval_rewards="math:1.0",
    description="math problems with or without images, answer checked with math-verify",
)

COUNT = Task(
    name="count",
    system_prompt=THINK_ANSWER_SYSTEM,
    train_template=QUERY_SLOT,
    eval_template=QUERY_SLOT,
    default_query=synthetic_count.COUNT_QUERY,
    default_rewards="count:1.0,format:0.5",
    eval_rewards="count:1.0",
    description="count objects in an image (built-in: synthetic shapes)",
    builtin=SyntheticData(
        synthetic_count.generate_count_dataset,
        version=synthetic_count.GENERATOR_VERSION,
        train=(256, 1),
        eval=(64, 2),
    ),
)

_BOXED_TEMPLATE = QUERY_SLOT + "\nSolve it step by step, then write the final answer as \\boxed{}."

GSM8K = Task(
    name="gsm8k",
    system_prompt=None,
    train_template=_BOXED_TEMPLATE,
    eval_template=_BOXED_TEMPLATE,
    default_query="",
    default_rewards="boxed:1.0",
    eval_rewards="boxed:1.0",
    description="text-only grade-school math, final answer in \\boxed{}",
)

# Text-only arithmetic for small chat models (SmolLM2-135M-Instruct on a CPU). Both rewards
# read the number the completion ends with: `number` gives credit for a right last number
# even without a box (the partial credit a 135M model needs to get any signal), and
# `boxed_number` adds as much again when it is in \boxed{}. Evaluation accuracy is the main
# (first) eval reward, `number`: the final boxed number, or else the last number, is right.
ARITH = Task(
    name="arith",
    system_prompt=None,  # the model's own default system prompt (SmolLM2's template adds one)
    train_template=QUERY_SLOT + "\nPut your final answer in \\boxed{}.",
    eval_template=QUERY_SLOT + "\nPut your final answer in \\boxed{}.",
    default_query="",
    default_rewards="number:1.0,boxed_number:1.0",
    eval_rewards="number:1.0,boxed_number:1.0",
    description="text-only sums and differences of numbers up to 20 (built-in), \\boxed{} answer",
    builtin=SyntheticData(
        synthetic_arith.generate_arith_dataset,
        version=synthetic_arith.GENERATOR_VERSION,
        train=(512, 1),
        eval=(128, 2),
    ),
)

_TASKS: dict[str, Task] = {task.name: task for task in (OCR, MATH, COUNT, GSM8K, ARITH)}


def available_tasks() -> list[str]:
    """Names of the tasks, in the order they are documented."""
    return list(_TASKS)


def get_task(name: str) -> Task:
    """The task called `name`; ValueError listing the tasks otherwise."""
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(_TASKS)}") from None
