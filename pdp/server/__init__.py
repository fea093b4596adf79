"""PDP servers: gRPC (DecisionService, health, reflection) and their entry point."""
