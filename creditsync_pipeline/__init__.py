"""creditsync: keep per-instance plans and credits equal to what billing says."""
