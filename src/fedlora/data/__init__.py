from .loader import BatchStream, Examples, concat, tokenize, tokenize_causal
from .partition import Split, label_histogram, split_task, stratified_sample
from .source import load_task_source, merge_tasks
from .tasks import DESCRIPTIONS, TASKS, Task, load_task, task_from_config

__all__ = ["DESCRIPTIONS", "TASKS", "BatchStream", "Examples", "Split", "Task", "concat", "label_histogram",
           "load_task", "load_task_source", "merge_tasks", "split_task", "stratified_sample", "task_from_config",
           "tokenize", "tokenize_causal"]
