"""The built-in case studies, one package each (task and presets, analysis, registration)."""
