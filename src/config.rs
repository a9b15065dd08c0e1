//! YAML configuration: schema, defaults and validation (DESIGN §6).
