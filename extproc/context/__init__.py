"""Context window management: token budgets and the strategies that fill them.

- `models`: context windows per model, safety margins per tokenizer family, config overrides.
- `budget`: what a request leaves for injected history.
- `window`: the sliding window (tokens and messages, coarse steps, tool exchanges whole).
- `manager`: the per-request plan rewrite applies.
"""

from extproc.context.manager import ContextManager, ContextPlan, ContextSettings

__all__ = ["ContextManager", "ContextPlan", "ContextSettings"]
