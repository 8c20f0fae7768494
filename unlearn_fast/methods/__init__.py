"""Unlearning methods (a registry): original, retrain, wf, ec and the baselines."""
from unlearn_fast.methods.registry import create_method, get_method_class, list_methods, register_method  # noqa: F401
from unlearn_fast.methods.base import Method, MethodOutput, RunContext  # noqa: F401
from unlearn_fast.methods import original, retrain, wf  # noqa: F401,E402  (register)
