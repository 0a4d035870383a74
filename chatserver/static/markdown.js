// Markdown of agent replies, as DOM nodes: markdown-it (raw HTML off: a "<script>" in the text
// stays text) makes markup that only DOMPurify parses, cleans and hands back as a
// DocumentFragment. The vendored libraries are in vendor/ (vendor/README.md).

import markdownit from "./vendor/markdown-it.js";
import DOMPurify from "./vendor/purify.js";

const md = markdownit({ html: false, linkify: true, breaks: true, typographer: false });

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    // Links open elsewhere and tell the target nothing about this page.
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

const PURIFY = {
  RETURN_DOM_FRAGMENT: true,
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe"],
  FORBID_ATTR: ["style"],
};

/** `text` (Markdown, untrusted) as a DocumentFragment of safe elements. */
export function renderMarkdown(text) {
  return DOMPurify.sanitize(md.render(text ?? ""), PURIFY);
}
