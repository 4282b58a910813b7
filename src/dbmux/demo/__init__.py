"""``dbmux demo`` and the workloads it shares with the benchmark: connection storms (storm), the
failover drill (drill, drill_pairs, drill_result), the demo's run, databases and reports."""
