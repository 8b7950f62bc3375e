// ComfyUI-TCAN front-end: shows the text report a TCAN node returns (ui.text) on the node itself,
// so an artist sees what a node found (frames without a person, models missing, ...) without a
// separate "show text" node.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const REPORT = "tcan_report";

function showReport(node, text) {
  let widget = node.widgets?.find((w) => w.name === REPORT);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, REPORT, ["STRING", { multiline: true }], app).widget;
    widget.inputEl.readOnly = true;
    widget.inputEl.style.opacity = 0.8;
    widget.serialize = false;
  }
  widget.value = text;
  requestAnimationFrame(() => {
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
    app.graph.setDirtyCanvas(true, false);
  });
}

app.registerExtension({
  name: "TCAN.Report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name.startsWith("TCAN")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text) showReport(this, [].concat(message.text).join("\n"));
    };
  },
});
