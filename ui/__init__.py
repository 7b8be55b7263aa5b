"""Streamlit-side helpers shared by app.py and the pages (the only package besides
pages/ that imports streamlit)."""
