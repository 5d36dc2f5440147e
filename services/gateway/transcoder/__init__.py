"""Calling the gRPC backends generically, by method descriptor."""
