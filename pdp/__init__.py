"""ABC policy decision point: manifests and signing, policy engine, ledger, servers."""
