"""APEX planning shared by the scheduler service and the verifier's local fallback.

numpy only: profile samples (``profiles``), the cost model fitted on them
(``cost_model``), what one iteration looks like and what a plan decides
(``plan``), the timing of each execution mode (``timing``), tier moves
(``tiering``), offload choice (``dispatch``) and the three policies
(``policies.plan``). The scheduler answers plan requests with these; a
verifier whose scheduler is slow or down runs the same code locally with the
last cost model it fetched.
"""
