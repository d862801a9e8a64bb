"""Integrations with other libraries. Each submodule imports its library lazily: `import attend` never needs it."""
