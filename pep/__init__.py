"""ABC policy enforcement point: the sidecar proxy beside the agent."""
