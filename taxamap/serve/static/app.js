/* taxamap serve: the page is one client of the HTTP API (/api/...). Every string from the
   server or the user is put into the page with textContent (never as HTML). The URL keeps the
   state (?species=...&band=...&stretch=...&threshold=...&compare=...), so a link reopens the same
   map. #status reads "ready" once the current overlay(s) are painted. */
(function () {
  "use strict";

  var $ = function (id) { return document.getElementById(id); };
  var RANGE_COLOR = "#7b3294";
  var OSM_URL = "https://tile.openstreetmap.org/{z}/{x}/{y}.png";

  var health = null;
  var land = null;
  var views = [];          // [{map, el, title, panel, key, answer, overlay, range, canvas}]
  var state = { species: "", upload: "", compare: "", band: "fused", stretch: 90, threshold: null };
  var generation = 0;      // the latest user action; older answers are dropped
  var syncing = false;

  // ------------------------------------------------------------------ helpers

  function setStatus(text, kind) {
    var el = $("status");
    el.textContent = text;
    el.className = kind || "";
  }

  function query(params) {
    var qs = new URLSearchParams();
    Object.keys(params).forEach(function (k) {
      if (params[k] !== undefined && params[k] !== null && params[k] !== "") qs.set(k, params[k]);
    });
    return qs.toString();
  }

  function answerOf(response) {
    return response.text().then(function (text) {
      var body = null;
      try { body = JSON.parse(text); } catch (e) { body = null; }
      if (!response.ok) {
        throw new Error((body && body.error) || ("the server answered " + response.status));
      }
      if (body === null) throw new Error("the server sent something that is not JSON");
      return body;
    });
  }

  function api(path, params) {
    return fetch(path + "?" + query(params)).then(answerOf);
  }

  function debounce(fn, ms) {
    var timer = null;
    var run = function () {
      var args = arguments;
      clearTimeout(timer);
      timer = setTimeout(function () { fn.apply(null, args); }, ms);
    };
    run.cancel = function () { clearTimeout(timer); };
    return run;
  }

  function fmt(value, digits) {
    return (value === null || value === undefined) ? "–" : Number(value).toFixed(digits);
  }

  function nextFrame() {
    return new Promise(function (resolve) {
      requestAnimationFrame(function () { requestAnimationFrame(resolve); });
    });
  }

  // ------------------------------------------------------------------ URL state

  function readUrl() {
    var p = new URLSearchParams(window.location.search);
    state.species = p.get("species") || "";
    state.upload = p.get("upload") || "";
    state.compare = p.get("compare") || "";
    state.band = p.get("band") || "fused";
    var stretch = parseFloat(p.get("stretch"));
    state.stretch = isFinite(stretch) ? Math.min(99, Math.max(0, stretch)) : 90;
    var m = /^percentile:([0-9.]+)$/.exec(p.get("threshold") || "");
    state.threshold = m ? Math.min(99.5, Math.max(50, parseFloat(m[1]))) : null;
  }

  function writeUrl() {
    var params = {
      species: state.upload ? "" : state.species, upload: state.upload, compare: state.compare,
      band: state.band === "fused" ? "" : state.band,
      stretch: state.stretch === 90 ? "" : state.stretch,
      threshold: state.threshold === null ? "" : "percentile:" + state.threshold
    };
    var qs = query(params);
    history.replaceState(null, "", qs ? "?" + qs : window.location.pathname);
  }

  // ------------------------------------------------------------------ maps

  // Each view has its own legend and cell readout (its .panel): side by side, the two maps'
  // colours stand for different scores.
  function makeView(mapId, titleId, panelId) {
    var map = L.map(mapId, { zoomSnap: 0.25, preferCanvas: true, worldCopyJump: false });
    map.createPane("land").style.zIndex = 150;
    map.createPane("scores").style.zIndex = 350;
    var view = { map: map, el: $(mapId), title: $(titleId), panel: $(panelId), key: null,
                 answer: null, overlay: null, range: null, canvas: L.canvas({ padding: 0.2 }) };
    var layers = {};
    if (land) {
      layers["land (Natural Earth)"] = L.geoJSON(land, {
        pane: "land", interactive: false,
        style: { color: "#9a9a9a", weight: 0.8, fillColor: "#f3f0e8", fillOpacity: 1 }
      }).addTo(map);
    }
    var tiles = L.tileLayer(OSM_URL, {
      maxZoom: 18, attribution: "© OpenStreetMap contributors"
    });
    var failed = false;
    tiles.on("tileerror", function () {
      if (failed) return;
      failed = true;  // offline: Natural Earth land stays as the base
      map.removeLayer(tiles);
      map.attributionControl.addAttribution("base: Natural Earth land (web tiles unavailable)");
    });
    tiles.addTo(map);
    layers["web map (OpenStreetMap)"] = tiles;
    L.control.layers(null, layers, { collapsed: true }).addTo(map);
    L.control.scale({ position: "bottomright" }).addTo(map);
    if (health && health.attribution) map.attributionControl.addAttribution(health.attribution);
    map.fitBounds(health.bounds);
    map.on("click", function (e) { showCell(e.latlng, view); showSpeciesAt(e.latlng, view); });
    map.on("move", function () { syncFrom(view); });
    view.el.addEventListener("dragover", function (e) {
      e.preventDefault(); view.el.classList.add("dragging");
    });
    view.el.addEventListener("dragleave", function () { view.el.classList.remove("dragging"); });
    view.el.addEventListener("drop", function (e) {
      e.preventDefault();
      view.el.classList.remove("dragging");
      if (e.dataTransfer && e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
    });
    return view;
  }

  function syncFrom(view) {
    if (syncing) return;
    syncing = true;
    views.forEach(function (other) {
      if (other !== view && other.key) {
        other.map.setView(view.map.getCenter(), view.map.getZoom(), { animate: false });
      }
    });
    syncing = false;
  }

  // Range polygons come in [-180, 180]; a grid across the antimeridian runs past 180.
  function toMapFrame(coords) {
    var b = health.bounds;
    var mid = (b[0][1] + b[1][1]) / 2;
    var lon = coords[0] + 360 * Math.round((mid - coords[0]) / 360);
    return L.latLng(coords[1], lon);
  }

  function setTitle(view, answer) {
    view.title.textContent = "";
    var name = document.createElement("b");
    name.textContent = answer.query;
    view.title.appendChild(name);
    if (answer.prompt && answer.prompt !== answer.query) {
      var prompt = document.createElement("span");
      prompt.className = "prompt";
      prompt.textContent = answer.prompt;
      view.title.appendChild(prompt);
    }
  }

  // A grid too large for one overlay (the world) comes as map tiles scored at the zoom's
  // pyramid level; #status says "ready" once the visible tiles have loaded.
  function paintTiles(view, answer) {
    return new Promise(function (resolve) {
      var layer = L.tileLayer(answer.tiles, {
        opacity: 0.85, pane: "scores", className: "score-tiles", maxZoom: 18,
        bounds: answer.bounds, keepBuffer: 1
      });
      layer.once("load", function () {
        if (view.overlay) view.map.removeLayer(view.overlay);
        view.overlay = layer;
        nextFrame().then(resolve);
      });
      layer.addTo(view.map);
    });
  }

  function paintOverlay(view, answer) {
    if (!answer.overlay && answer.tiles) return paintTiles(view, answer);
    return new Promise(function (resolve, reject) {
      var layer = L.imageOverlay(answer.overlay, answer.bounds, {
        opacity: 0.85, pane: "scores", className: "overlay", interactive: false
      });
      layer.once("load", function () {
        if (view.overlay) view.map.removeLayer(view.overlay);
        view.overlay = layer;
        nextFrame().then(resolve);
      });
      layer.once("error", function () {
        view.map.removeLayer(layer);
        reject(new Error("the overlay image could not be loaded"));
      });
      layer.addTo(view.map);
    });
  }

  function drawRange(view) {
    if (!view.key || state.threshold === null) return Promise.resolve(null);
    var params = Object.assign({}, view.key, {
      band: state.band, threshold: "percentile:" + state.threshold
    });
    return api("/api/range", params).then(function (fc) {
      if (view.range) view.map.removeLayer(view.range);
      view.range = L.geoJSON(fc, {
        renderer: view.canvas, interactive: false, coordsToLatLng: toMapFrame,
        style: { color: RANGE_COLOR, weight: 2, fill: false }
      }).addTo(view.map);
      view.el.dataset.rangeParts = String(fc.features.length);
      return fc;
    });
  }

  function inPanel(view, name) {
    return view.panel.querySelector("." + name);
  }

  function showLegend(view, answer) {
    var s = answer.stretch;
    inPanel(view, "legend-min").textContent = fmt(s.vmin, 3);
    inPanel(view, "legend-max").textContent = fmt(s.vmax, 3);
    var b = answer.bands[answer.band];
    var bar = inPanel(view, "legend-bar");
    // The model sees nothing that sets this query apart from the panel here: say so.
    inPanel(view, "legend-signal").textContent = answer.no_signal ? "\u26a0 " + answer.no_signal : "";
    if (answer.legend) {  // a trust layer: its own colours, unit and what high means
      bar.style.background = answer.legend.gradient;
      inPanel(view, "legend-note").textContent = answer.band + ": " + answer.legend.unit + "; " +
        answer.legend.meaning + ". " + answer.legend.stretch + ".";
      return;
    }
    if (health) bar.style.background = health.gradient;
    inPanel(view, "legend-note").textContent = (s.fixed
      ? answer.band + ": the share of the reference panel's species scoring lower here; " +
        "one fixed scale, 0 to 1, for every species. "
      : "score (" + answer.band + "): raw cosine similarity; " +
        "colours from the " + s.percentile + "th percentile to the maximum. ") +
      "Cells: mean " + fmt(b.mean, 3) + ", max " + fmt(b.max, 3) + ".";
  }

  function setBands(bands) {
    var select = $("band");
    if (select.options.length === bands.length) return;
    select.textContent = "";
    bands.forEach(function (name) {
      var option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      select.appendChild(option);
    });
    if (bands.indexOf(state.band) < 0) state.band = "fused";
    select.value = state.band;
  }

  function updateDownloads() {
    var key = views.length ? views[0].key : null;
    ["tif", "png", "gpkg"].forEach(function (format) {
      var a = $("dl-" + format);
      if (!key) { a.classList.add("disabled"); a.href = "#"; return; }
      a.classList.remove("disabled");
      var params = Object.assign({}, key, { format: format, band: state.band });
      if (format === "gpkg") params.threshold = "percentile:" + (state.threshold === null ? 90 : state.threshold);
      a.href = "/api/download?" + query(params);
    });
  }

  function mapOne(view, answerPromise) {
    return answerPromise.then(function (answer) {
      view.answer = answer;
      setTitle(view, answer);
      return paintOverlay(view, answer).then(function () {
        return drawRange(view);
      }).then(function () { return answer; });
    });
  }

  // Map what the state names, in every view; #status says "ready" once all are painted.
  function refresh(started) {
    var mine = ++generation;
    started = started || performance.now();
    var keys = [];
    if (state.upload) keys.push({ upload: state.upload });
    else if (state.species) keys.push({ species: state.species });
    if (!keys.length) {
      setStatus("type a species name (or drop a photo or a recording on the map)");
      return Promise.resolve();
    }
    if (state.compare) keys.push({ species: state.compare });
    ensureViews(keys.length);
    setStatus("mapping…", "busy");
    var common = { band: state.band, stretch: state.stretch };
    var jobs = keys.map(function (key, i) {
      views[i].key = key;
      return mapOne(views[i], api("/api/map", Object.assign({}, key, common)));
    });
    writeUrl();
    updateDownloads();
    return Promise.all(jobs).then(function (answers) {
      if (mine !== generation) return;
      setBands(Object.keys(answers[0].bands));
      answers.forEach(function (answer, i) { showLegend(views[i], answer); });
      var ms = performance.now() - started;
      document.body.dataset.paintMs = ms.toFixed(0);
      var server = answers.map(function (a) { return a.elapsed_ms; }).join(" + ");
      $("threshold-value").textContent = state.threshold === null ? "off" : "p" + state.threshold;
      setStatus("ready");
      $("status").title = "painted " + ms.toFixed(0) + " ms after the request (server " + server + " ms)";
    }).catch(function (err) {
      if (mine !== generation) return;
      setStatus(err.message, "error");
    });
  }

  function ensureViews(n) {
    if (n > 1 && views.length < 2) {
      $("pane2").hidden = false;
      views[0].map.invalidateSize();
      var panel = $("panel").cloneNode(true);  // the second map's legend and cell readout
      panel.id = "panel2";
      panel.querySelector(".cell").id = "cell2";
      panel.querySelector(".cell").textContent = "Click a cell to read its scores.";
      $("pane2").appendChild(panel);
      views.push(makeView("map2", "title2", "panel2"));
      views[1].map.setView(views[0].map.getCenter(), views[0].map.getZoom(), { animate: false });
    }
    if (n > 1) $("pane2").hidden = false;
    if (n < 2 && views.length > 1) {
      $("pane2").hidden = true;
      views[1].key = null;
    }
    views.forEach(function (v) { v.map.invalidateSize(); });
  }

  // ------------------------------------------------------------------ cell scores

  function cellTable(cell) {
    var box = document.createElement("div");
    var head = document.createElement("div");
    var name = document.createElement("b");
    name.textContent = cell.query;
    head.appendChild(name);
    head.appendChild(document.createTextNode(
      " · cell at " + cell.lat.toFixed(4) + ", " + cell.lon.toFixed(4)));
    box.appendChild(head);
    var table = document.createElement("table");
    Object.keys(cell.scores).forEach(function (band) {
      var tr = document.createElement("tr");
      [band, fmt(cell.scores[band], 4)].forEach(function (text, i) {
        var td = document.createElement(i === 0 ? "th" : "td");
        td.textContent = text;
        tr.appendChild(td);
      });
      table.appendChild(tr);
    });
    box.appendChild(table);
    return box;
  }

  // A click on either map reads the cell in every view: each view's panel and a popup on each
  // map show that view's own query's scores.
  function showCell(latlng, clicked) {
    var active = views.filter(function (v) { return v.key; });
    if (!active.length) return;
    active.forEach(function (view) {
      api("/api/cell", Object.assign({}, view.key, { lat: latlng.lat, lon: latlng.lng }))
        .then(function (cell) {
          var readout = inPanel(view, "cell");
          readout.textContent = "";
          readout.appendChild(cellTable(cell));
          var popup = cellTable(cell);
          if (cell.patch) {
            var img = document.createElement("img");
            img.className = "popup-patch";
            img.alt = "satellite patch of this cell";
            img.src = cell.patch;
            popup.appendChild(img);
          }
          // One popup per map, moved to the new cell. Only the clicked map pans to fit it; the
          // views stay in step.
          view.popup = view.popup || L.popup({ maxWidth: 320 });
          view.popup.options.autoPan = view === clicked;
          view.popup.setLatLng(latlng).setContent(popup).openOn(view.map);
        })
        .catch(function (err) {
          inPanel(view, "cell").textContent = err.message;
        });
    });
  }

  // ------------------------------------------------------------------ what lives here?

  // The reference panel's likeliest species at the clicked cell, each a link that maps it.
  function showSpeciesAt(latlng, view) {
    var box = inPanel(view, "here");
    box.textContent = "what lives here? …";
    api("/api/species", { lat: latlng.lat, lon: latlng.lng, top: 10 })
      .then(function (answer) {
        box.textContent = "";
        var head = document.createElement("div");
        head.textContent = "Likeliest here (" + answer.panel + "):";
        head.title = answer.rule;
        box.appendChild(head);
        var list = document.createElement("ol");
        list.className = "species-at";
        answer.species.forEach(function (sp) {
          var li = document.createElement("li");
          var a = document.createElement("a");
          a.href = "?" + query({ species: sp.name });
          a.textContent = sp.name;
          a.title = sp.prompt;
          a.addEventListener("click", function (e) {
            e.preventDefault();
            $("species").value = sp.name;
            submitSpecies(sp.name);
          });
          li.appendChild(a);
          li.appendChild(document.createTextNode(
            " " + fmt(sp.score, 3) + " · above " + (Math.floor(sp.relative * 1000) / 10) + "% of the panel"));
          list.appendChild(li);
        });
        box.appendChild(list);
      })
      .catch(function (err) { box.textContent = err.message; });
  }

  // ------------------------------------------------------------------ queries

  function submitSpecies(name) {
    suggest.cancel();  // the map, not a suggestion list, is what the server should work on now
    hideSuggestions();
    state.species = name.trim();
    state.upload = "";
    if (!state.species) {
      setStatus("type a species name first, e.g. Cardinalis cardinalis", "error");
      return;
    }
    refresh(performance.now());
  }

  function upload(file) {
    var started = performance.now();
    var mine = ++generation;
    if (health && file.size > health.max_upload_bytes) {
      setStatus("that file is larger than " + (health.max_upload_bytes / 1048576) + " MB", "error");
      return;
    }
    setStatus("embedding " + file.name + "…", "busy");
    var form = new FormData();
    form.append("file", file, file.name);
    fetch("/api/query?" + query({ band: state.band, stretch: state.stretch }),
          { method: "POST", body: form })
      .then(answerOf)
      .then(function (answer) {
        if (mine !== generation) return;
        state.upload = answer.upload;
        state.species = "";
        $("species").value = "";
        refresh(started);
      })
      .catch(function (err) {
        if (mine !== generation) return;
        // A TypeError is fetch's word for a connection that broke (the server closed it).
        setStatus(err instanceof TypeError ? "the upload did not reach the server (the " +
                  "connection was closed); try again" : err.message, "error");
      });
  }

  // ------------------------------------------------------------------ suggestions

  var active = -1;

  function hideSuggestions() {
    $("suggestions").hidden = true;
    active = -1;
  }

  function showSuggestions(items) {
    var list = $("suggestions");
    list.textContent = "";
    active = -1;
    items.forEach(function (item) {
      var li = document.createElement("li");
      li.setAttribute("role", "option");
      li.dataset.name = item.name;
      li.appendChild(document.createTextNode(item.name));
      if (item.common) {
        var common = document.createElement("span");
        common.className = "common";
        common.textContent = item.common;
        li.appendChild(common);
      }
      li.addEventListener("mousedown", function (e) {
        e.preventDefault();
        $("species").value = item.name;
        submitSpecies(item.name);
      });
      list.appendChild(li);
    });
    list.hidden = items.length === 0;
  }

  var suggest = debounce(function (text) {
    if (!text.trim()) { hideSuggestions(); return; }
    api("/api/search", { q: text }).then(function (items) {
      if ($("species").value === text && document.activeElement === $("species")) {
        showSuggestions(items);
      }
    }).catch(function () { hideSuggestions(); });
  }, 120);

  function moveActive(step) {
    var items = $("suggestions").querySelectorAll("li");
    if (!items.length || $("suggestions").hidden) return false;
    if (active >= 0) items[active].classList.remove("active");
    active = (active + step + items.length) % items.length;
    items[active].classList.add("active");
    $("species").value = items[active].dataset.name;
    return true;
  }

  // ------------------------------------------------------------------ wiring

  function wire() {
    $("species").addEventListener("input", function (e) { suggest(e.target.value); });
    $("species").addEventListener("keydown", function (e) {
      if (e.key === "ArrowDown" && moveActive(1)) e.preventDefault();
      else if (e.key === "ArrowUp" && moveActive(-1)) e.preventDefault();
      else if (e.key === "Escape") hideSuggestions();
    });
    $("species").addEventListener("blur", function () { setTimeout(hideSuggestions, 150); });
    $("query-form").addEventListener("submit", function (e) {
      e.preventDefault();
      submitSpecies($("species").value);
    });
    $("file").addEventListener("change", function (e) {
      if (e.target.files.length) upload(e.target.files[0]);
      e.target.value = "";
    });
    $("compare-form").addEventListener("submit", function (e) {
      e.preventDefault();
      state.compare = $("compare").value.trim();
      refresh();
    });
    $("band").addEventListener("change", function (e) { state.band = e.target.value; refresh(); });
    var restretch = debounce(function () { refresh(); }, 150);
    $("stretch").addEventListener("input", function (e) {
      state.stretch = parseFloat(e.target.value);
      $("stretch-value").textContent = "p" + state.stretch;
      restretch();
    });
    var rerange = debounce(function () {
      var mine = generation;
      writeUrl();
      updateDownloads();
      setStatus("drawing the range…", "busy");
      Promise.all(views.filter(function (v) { return v.key; }).map(drawRange)).then(function (fcs) {
        if (mine !== generation) return;
        var fc = fcs[0];
        if (fc) {
          $("threshold-value").textContent = "p" + state.threshold + " ≥ " + fmt(fc.threshold, 3) +
            ", " + Math.round(fc.area_km2).toLocaleString() + " km²";
        }
        setStatus("ready");
      }).catch(function (err) { setStatus(err.message, "error"); });
    }, 150);
    $("threshold").addEventListener("input", function (e) {
      state.threshold = parseFloat(e.target.value);
      $("threshold-value").textContent = "p" + state.threshold;
      rerange();
    });
  }

  function start() {
    readUrl();
    $("species").value = state.species;
    $("compare").value = state.compare;
    $("stretch").value = state.stretch;
    $("stretch-value").textContent = "p" + state.stretch;
    if (state.threshold !== null) $("threshold").value = state.threshold;
    fetch("/api/health").then(answerOf).then(function (h) {
      health = h;
      document.querySelectorAll(".legend-bar").forEach(function (bar) {
        bar.style.background = h.gradient;
      });
      setBands(h.bands);
      return fetch("/api/land").then(answerOf).catch(function () { return null; });
    }).then(function (fc) {
      land = fc;
      views.push(makeView("map", "title", "panel"));
      wire();
      updateDownloads();
      return refresh();
    }).catch(function (err) {
      setStatus("cannot reach the taxamap server: " + err.message, "error");
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
