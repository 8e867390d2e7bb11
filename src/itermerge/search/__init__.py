"""Algorithm 2's (λ, α) search (§3.2, §4.2): the grid on dev (``points``), the Pareto frontier and the paper's rule
(``selection``), the chosen merge written and tested once (``finalize``)."""
