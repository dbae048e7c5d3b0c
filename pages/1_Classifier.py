"""ResNet-20 on scikit-learn's digits: accuracy, confusion matrix and the mistakes it makes."""

from __future__ import annotations

import numpy as np
import streamlit as st

from jpq_core.data.classification import load_classification
from jpq_core.errors import JPQError
from app_support.ui import cached_classifier, show_error
from jpq_core.evaluation import classifier_logits, classifier_summary
from jpq_core.plots import confusion_figure

st.set_page_config(page_title="Classifier - JPQ Explorer", layout="wide")
st.title("Classifier: ResNet-20 on handwritten digits")
st.caption("The pruning stage of the paper is also tested on ResNet. Here ResNet-20 (He et al. 2016), trained "
           "from scratch on scikit-learn's 8x8 digits upsampled to 32x32, is scored on the held-out 30%.")


@st.cache_data(show_spinner="Classifying the test split...")
def _predictions(network: str):
    images, labels = load_classification("digits", "test")
    logits = classifier_logits(cached_classifier(network), images)
    return images.numpy(), labels.numpy(), logits


try:
    images, labels, logits = _predictions("resnet20")
except JPQError as exc:
    show_error(exc)
    st.stop()

summary = classifier_summary(logits, labels)
predicted = summary["predicted"]
cols = st.columns(3)
cols[0].metric("Top-1 accuracy", f"{summary['top1']:.2%}")
cols[1].metric("Test images", f"{len(labels)}")
cols[2].metric("Mistakes", f"{len(summary['mistakes'])}")
left, right = st.columns([3, 2])
left.plotly_chart(confusion_figure(summary["confusion"], range(summary["classes"])), width="stretch")
wrong = summary["mistakes"][:12]
right.markdown("**Mistakes** (true → predicted)")
if len(wrong) == 0:
    right.write("None on this split.")
else:
    grid = right.columns(4)
    for i, idx in enumerate(wrong):
        img = images[idx, 0] * 0.25 + 0.5  # undo the digits normalisation for display
        grid[i % 4].image(np.clip(img, 0, 1), caption=f"{labels[idx]} → {predicted[idx]}", clamp=True, width=72)
