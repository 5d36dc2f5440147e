// The payment dialog (tickets and tips): a native <dialog>, errors shown inside it so a
// declined card can be corrected without starting over.

import { parseUsd } from "./api.js";
import { $, h, showError } from "./ui.js";

/**
 * @param {object} options title, summary, recipients ([{name, label}]) for a tip or
 *   null for a ticket, submit(values) → Promise (throws to keep the dialog open)
 * @returns {Promise<boolean>} whether the payment went through
 */
export function openPay({ title, summary, recipients, submit }) {
  const dialog = $("#pay-dialog");
  const form = $("#pay-form");
  const tip = Array.isArray(recipients);
  $("#pay-title").textContent = title;
  $("#pay-summary").textContent = summary || "";
  $("#tip-recipient-label").hidden = !tip;
  $("#tip-amount-label").hidden = !tip;
  $("#tip-message-label").hidden = !tip;
  const select = $("#tip-recipient");
  select.replaceChildren(...(recipients || []).map((r) => h("option", { value: r.name }, r.label)));
  form.querySelector("[data-error]").textContent = "";
  const card = form.elements.card;
  if (!card.value) card.value = "4242 4242 4242 4242";

  return new Promise((resolve) => {
    let paid = false;
    const onSubmit = async (event) => {
      if (event.submitter && event.submitter.value === "cancel") return; // closes the dialog
      event.preventDefault();
      const values = {
        card: card.value.replace(/[\s-]/g, ""),
        recipient: select.value,
        message: form.elements.message.value.trim(),
        amount: parseUsd(form.elements.amount.value),
      };
      const slot = form.querySelector("[data-error]");
      if (!/^\d{12,19}$/.test(values.card) && !values.card.startsWith("tok_")) {
        slot.textContent = "Enter a card number (12 to 19 digits).";
        return;
      }
      if (tip && !values.recipient) {
        slot.textContent = "No one is on stage to tip.";
        return;
      }
      if (tip && !values.amount) {
        slot.textContent = "Enter an amount such as 2.50.";
        return;
      }
      const button = $("#pay-submit");
      button.disabled = true;
      slot.textContent = "";
      try {
        await submit(values);
        paid = true;
        dialog.close();
      } catch (error) {
        showError(error, form);
      } finally {
        button.disabled = false;
      }
    };
    const onClose = () => {
      form.removeEventListener("submit", onSubmit);
      dialog.removeEventListener("close", onClose);
      resolve(paid);
    };
    form.addEventListener("submit", onSubmit);
    dialog.addEventListener("close", onClose);
    dialog.showModal();
  });
}
