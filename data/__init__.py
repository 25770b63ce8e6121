"""Datasets and tasks: reading the five data formats, prompt templates, built-in synthetic data.

Typical use:

    samples = load_samples("train.jsonl")              # validated list[Sample]
    task = get_task("ocr")
    messages = task.messages(samples[0])              # Qwen chat messages for the prompt
    path = task.default_data(cache_dir, "eval")       # built-in data when --data is not given
"""

from data.fonts import find_cjk_font, has_glyph, load_cjk_font
from data.images import image_size_problem
from data.readers import find_index_file, load_samples
from data.sample import DataError, ImageRef, ParquetCell, Sample
from data.synthetic_count import generate_count_dataset
from data.synthetic_ocr import generate_ocr_dataset
from data.tasks import Task, available_tasks, get_task

__all__ = [
    "DataError",
    "ImageRef",
    "ParquetCell",
    "Sample",
    "Task",
    "available_tasks",
    "find_cjk_font",
    "find_index_file",
    "generate_count_dataset",
    "generate_ocr_dataset",
    "get_task",
    "has_glyph",
    "image_size_problem",
    "load_cjk_font",
    "load_samples",
]
