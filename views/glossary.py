"""Glossary page: every term the other pages use, one sentence each, to point a class to."""

import streamlit as st

from ui.glossary import by_group

st.title("Glossary")
st.caption("The words LayerScope's pages use, in one sentence each.")

for group, terms in by_group().items():
    st.subheader(group)
    for term in terms:
        st.markdown(f"**{term.name}** — {term.text}")
