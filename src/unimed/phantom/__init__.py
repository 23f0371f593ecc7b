"""The phantom world: a seeded generator of synthetic chest studies with bilingual reports."""
