"""Plumbing shared by analyses and pages: models, data, metrics, hooks. No streamlit."""
