"""The conclusions ``diffaudit verify`` can reach, in plain words: one wording for the CLI, the report, the
dashboard and the README (kept here, in the core, because the report and the dashboard may not import the
provenance stage)."""

from __future__ import annotations

INTACT = "credentials intact"
TAMPERED = "tampered"
SAME = "same image, credentials stripped"
EDITED = "edited copy of a stamped image"
SOURCE = "source of a stamped edit"
AMBIGUOUS = "ambiguous"
NONE = "no evidence"

#: Each conclusion, in the order a reader meets them, with what it means and what it does not.
CONCLUSIONS: dict[str, str] = {
    INTACT: "The file carries its own C2PA manifest and it validates now, with this verification's trust "
            "settings. Whether to believe it depends on the signer: Trusted means it chains to an anchor you "
            "gave (or to the development root, which vouches for no one but its maker); Valid means intact "
            "but signed by someone your settings do not know.",
    TAMPERED: "The file carries a manifest that does not validate: its pixels or the manifest changed after "
              "signing (every failure code is listed). A stored stamp it resembles is shown only as the image "
              "it was derived from, never as this file's credentials.",
    SAME: "No valid manifest in the file, but a stamp in the store has the same picture: its watermark or its "
          "fingerprint names that stamp AND the pixels agree with the stored thumbnail (re-encoded, resized or "
          "re-saved, but not cropped, shifted or recoloured: a 1% crop already fails). The stamp's credentials are "
          "shown as recorded at stamp time, and re-checked now where the store kept the manifest.",
    EDITED: "The file's watermark names a stamp in the store, but its pixels are not that picture (edited, "
            "cropped, recoloured, partly replaced, or too flat to check): it was derived from that stamp. "
            "The stamp's credentials describe the original, not this file.",
    SOURCE: "The file matches the source image (ingredient) of an img2img or inpainting stamp better than the "
            "stamp's output: it is what the model started from, not AI output.",
    AMBIGUOUS: "More than one stored image matches about equally well, so none is named; all are listed.",
    NONE: "Nothing ties the file to a stamp: no valid manifest, no watermark whose payload the store knows, "
          "and no stored image whose content agrees (flat and low-texture images never match). This says "
          "nothing about whether the file is AI-made.",
}
