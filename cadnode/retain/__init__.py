"""Housekeeping: what the node keeps, for how long, and removing the rest safely.

`policy` says which studies' data of each kind may go (never an unfinished job's, an unsent
result's, or a pinned study's); `removal` removes it so rows and files agree after a kill at
any moment; `stage` is the conveyor stage that runs a pass every `retention.check_every_s`;
`pins` keeps a study (`cadnode pin`); `usage` is `cadnode storage` (and its dry run);
`metrics` the removal counters of /metrics.
"""

from cadnode.retain.stage import Housekeeper

__all__ = ["Housekeeper"]
