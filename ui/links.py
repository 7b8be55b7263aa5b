"""Links: the page, the model and the recipe in the address, so a refresh or a link opens
what was on screen.

The page is the address's path (`/lab`); the query holds

    v   this browser's visitor id (`ui.experiments`; never in a link offered for sharing)
    m   the model spec, loaded exactly as if typed in the sidebar: the same checks, and the
        loading opt-ins stay off (a link never loads what the server would refuse when typed)
    p   the precision, when not "auto"
    r   the recipe: `z` + base64url of its zlib-compressed JSON; when that is too long for an
        address, `<row>.<digest>`: the row of the experiments database that holds it (opens
        that one recipe, nothing else of its visitor's)

A recipe from a link goes through `export.read_recipe`, like an uploaded file, and is applied
on the lab page, which measures it again. A malformed or hostile parameter is reported in
words and changes nothing else.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import zlib
from urllib.parse import urlencode

import streamlit as st

from analysis.compress.export import read_recipe
from analysis.compress.lab import Lab
from analysis.compress.recipe import MAX_RECIPE_BYTES, Recipe
from lib.devices import DTYPES
from lib.errors import RecipeError
from lib.handle import ModelHandle
from ui.experiments import VISITOR_PARAM, current_row, record_new, shared_recipe, visitor
from ui.session import LoadRequest, change_recipe, current_lab, opted_in, placement_choice, request_load

MODEL_PARAM, DTYPE_PARAM, RECIPE_PARAM = "m", "p", "r"
MAX_SPEC = 1000  # the sidebar's text box takes as many characters
MAX_INLINE = 1800  # characters of an encoded recipe kept in the address (browsers take far more; chat apps less)
MAX_PARAM = 8192  # a longer parameter is refused before it is decoded
ROW_REFERENCE = re.compile(r"(\d{1,12})\.([0-9a-f]{16})")


def encode_recipe(recipe: Recipe) -> str:
    """`z` + base64url (no padding) of the zlib-compressed compact JSON of `recipe`."""
    text = json.dumps(recipe.to_dict(), separators=(",", ":"))
    return "z" + base64.urlsafe_b64encode(zlib.compress(text.encode("utf-8"), 9)).rstrip(b"=").decode("ascii")


def decode_recipe(value: str) -> str:
    """The recipe JSON text in an `r` parameter written by `encode_recipe`. Anything else, or
    one that inflates past `MAX_RECIPE_BYTES`, is a RecipeError saying so."""
    if not value.startswith("z") or len(value) > MAX_PARAM or not re.fullmatch(r"[A-Za-z0-9_-]*", value[1:]):
        raise RecipeError("The recipe in this link is not one LayerScope writes (it starts with 'z' and holds only "
                          "letters, digits, '-' and '_'); it may have been cut off when the link was copied.")
    try:
        packed = base64.urlsafe_b64decode(value[1:] + "=" * (-len(value[1:]) % 4))
        inflater = zlib.decompressobj()
        data = inflater.decompress(packed, MAX_RECIPE_BYTES + 1)  # a zip bomb stops here
    except (binascii.Error, ValueError, zlib.error) as e:
        raise RecipeError("The recipe in this link cannot be unpacked; it may have been cut off or changed when "
                          "the link was copied.") from e
    if len(data) > MAX_RECIPE_BYTES or inflater.unconsumed_tail:
        raise RecipeError(f"The recipe in this link unpacks to more than {MAX_RECIPE_BYTES // 1024} KiB; a recipe "
                          "takes a few KiB.")
    if not inflater.eof:
        raise RecipeError("The recipe in this link is cut off; copy the whole link again.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError("The recipe in this link is not text.") from e


def recipe_text(value: str) -> str:
    """The recipe JSON an `r` parameter names: inline, or a stored row by `<row>.<digest>`."""
    reference = ROW_REFERENCE.fullmatch(value)
    if reference is None:
        return decode_recipe(value)
    text = shared_recipe(int(reference[1]), reference[2])
    if text is None:
        raise RecipeError("The recipe this link names is not in this server's experiments database (it was made on "
                          "another server, or deleted).")
    return text


def recipe_param(lab: Lab) -> str | None:
    """The `r` value for the lab's current recipe (None for no edits, or when it is too long
    for an address and not stored)."""
    if not lab.current.edits:
        return None
    inline = encode_recipe(lab.recipe)
    if len(inline) <= MAX_INLINE:
        return inline
    row = current_row(lab)
    return None if row is None else f"{row}.{lab.current.digest}"


# ---------------------------------------------------------------------- reading the address


def restore() -> None:
    """Once per session, before the model is picked: adopt the address's visitor id, load its
    model (as if typed) and keep its recipe for the lab page (`apply_pending`). Whatever is
    wrong with the address is said at the top of the page; the rest still opens."""
    if st.session_state.get("links_read"):
        return
    st.session_state["links_read"] = True
    visitor()
    notes: list[str] = st.session_state.pop("link_notes", [])
    params = {k: st.query_params.get(k) for k in (MODEL_PARAM, DTYPE_PARAM, RECIPE_PARAM)}
    long = sorted(k for k, v in params.items() if v is not None and len(v) > MAX_PARAM)
    if long:
        notes.append(f"This link's parameter(s) {', '.join(long)} are longer than {MAX_PARAM:,} characters, which "
                     "no link LayerScope writes is; they were ignored.")
        params.update(dict.fromkeys(long))
    spec, dtype, recipe = params[MODEL_PARAM], params[DTYPE_PARAM], params[RECIPE_PARAM]
    if dtype is not None and dtype not in DTYPES:
        notes.append(f"This link's precision is not one of {', '.join(DTYPES)}; the model loads in its own.")
        dtype = None
    if spec is not None:
        spec = spec.strip()
        if not spec or len(spec) > MAX_SPEC:
            notes.append(f"This link's model name is empty or longer than {MAX_SPEC:,} characters; the default "
                         "model is loaded instead.")
        else:  # exactly as typed in the sidebar: this session's opt-ins (none yet), its placement
            request_load(LoadRequest(spec, **opted_in(), **{**placement_choice(), "dtype": dtype or "auto"}))
    if recipe is not None:
        try:
            st.session_state["link_recipe"] = (recipe, recipe_text(recipe))
        except RecipeError as e:
            notes.append(f"{e} The lab starts from the model without edits.")
    for note in notes:
        st.warning(note, icon=":material/link_off:")


def apply_pending(lab: Lab) -> None:
    """Apply the recipe a link brought (once), checked like an uploaded recipe file; on a bad
    one say why and keep the lab as it was."""
    pending = st.session_state.pop("link_recipe", None)
    if pending is not None:
        change_recipe("Applying the recipe from the link", lambda p: lab.apply(read_recipe(pending[1], lab.base), p))


# ---------------------------------------------------------------------- writing the address


def view_params(handle: ModelHandle | None) -> dict[str, str]:
    """The model, precision and recipe of this session as query parameters (no visitor id)."""
    params: dict[str, str] = {}
    request = st.session_state.get("load_request")
    if request is not None:
        params[MODEL_PARAM] = request.spec
        if request.dtype != "auto":
            params[DTYPE_PARAM] = request.dtype
    lab = current_lab(handle) if handle is not None else None
    pending = st.session_state.get("link_recipe")
    recipe = recipe_param(lab) if lab is not None else pending[0] if pending else None
    if recipe is not None:
        params[RECIPE_PARAM] = recipe
    return params


def share_link(handle: ModelHandle | None) -> str:
    """This page's address with the model and the recipe, without the visitor id."""
    page = st.context.url or ""  # the page's address, without its query (None outside a browser)
    return f"{page}?{urlencode(view_params(handle))}"


def reflect(handle: ModelHandle | None) -> None:
    """After the page ran: store what the lab measured, write the view into the address (only
    the parameters that changed), and offer the link to share in the sidebar."""
    lab = current_lab(handle) if handle is not None else None
    if lab is not None:
        record_new(lab)
    wanted = {VISITOR_PARAM: visitor(), **view_params(handle)}
    for key in (VISITOR_PARAM, MODEL_PARAM, DTYPE_PARAM, RECIPE_PARAM):
        if key not in wanted and key in st.query_params:
            del st.query_params[key]
        elif key in wanted and st.query_params.get(key) != wanted[key]:
            st.query_params[key] = wanted[key]
    with st.sidebar.expander("Link to this view", icon=":material/link:"):
        st.code(share_link(handle), language=None, wrap_lines=True)
        st.caption("Copy it (the button at its corner) to open this page, model and recipe in any browser: the "
                   "recipe is applied and measured again there. It leaves out your visitor id, so it shows your "
                   "recipe, not your history.")
