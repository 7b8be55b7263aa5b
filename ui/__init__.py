"""Streamlit-side helpers shared by app.py and the pages (the only package besides
views/ that imports streamlit)."""
