"""Teacher backends. They know nothing about HTTP or gRPC: items in, arrays out."""
