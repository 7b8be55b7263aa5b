"""Pure computation over a `lib.handle.ModelHandle`: importable from a notebook, no streamlit."""
