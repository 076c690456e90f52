"""Route: choose what happens to a complete study, by the rules in `rules.yaml`.

- values.py: what a rule can look at, each value read as its DICOM type (VR) says
- language.py: the conditions of `match:` (operators, all / any / not), parsed with positions
- rules.py: rules, their actions and scope, loading and evaluating them in order
- live.py: the rules in force, swapped whole on SIGHUP or when the file changes
- stage.py: the route stage, writing each decision onto its job
- explain.py: `cadnode rules explain` and `cadnode rules test`
"""

from cadnode.route.live import LiveRules
from cadnode.route.rules import Action, Decision, Rule, RuleSet, Scope, load_rules
from cadnode.route.stage import Router
from cadnode.route.values import Subject

__all__ = [
    "Action",
    "Decision",
    "LiveRules",
    "Router",
    "Rule",
    "RuleSet",
    "Scope",
    "Subject",
    "load_rules",
]
