"""The application layer: one module per aggregate. It owns the unit of work and the business
rules, calls the repositories, and imports neither grpc nor protobuf."""
