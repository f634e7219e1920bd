from .loader import BatchStream, Examples, concat, tokenize, tokenize_causal
from .partition import Split, label_histogram, split_task, stratified_sample
from .tasks import DESCRIPTIONS, TASKS, Task, load_task

__all__ = ["DESCRIPTIONS", "TASKS", "BatchStream", "Examples", "Split", "Task", "concat", "label_histogram",
           "load_task", "split_task", "stratified_sample", "tokenize", "tokenize_causal"]
