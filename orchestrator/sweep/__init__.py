"""Ray Tune sweeps, by job: the sweep file and each trial's config (`config`), which trials run at once
(`admission`), one trial's pipeline run (`trial`), the table and plot of the results (`results`). The command is
`orchestrator.tune`."""
