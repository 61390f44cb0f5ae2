defmodule SseGateway.Test do
  @moduledoc """
  For an app's own ExUnit tests: publishes are captured in the test process
  instead of sent, and subscriptions are served in memory. No gateway needed.

      # config/test.exs
      config :sse_gateway, mode: :test

      # a test
      import SseGateway.Test

      test "renaming a project tells its viewers" do
        MyApp.Projects.rename(project, "Roof")
        assert_broadcast "project", :project_updated, %{"uuid" => project.uuid, "name" => "Roof"}
        assert_published SseGateway.Projects.topic_project(project.uuid), :project_updated
      end

  In `:test` mode:

  - every publish and broadcast is validated as for real (bad topics, event
    names, payloads without a UUID answer the same errors), its data is
    round-tripped through JSON (so tests see string keys, as subscribers do),
    and `{:sse_gateway_published, %{topics:, event:, data:, route:, key:}}`
    is sent to the calling process and to its `$callers` (tasks started by
    the test). The answer is `{:ok, "test-<n>"}`.
  - `subscribe/1,2` (and `SseGateway.Projects.subscribe/1`) register the
    process in memory; a captured publish to one of its topics is delivered as
    the gateway would (`{:projects, event, payload}` or
    `{:sse_gateway, :event, %SseGateway.Event{}}`), once per subscription.
    Broadcasts through the projects routes get the module's topics; other
    routes have no topics here.
  """

  import ExUnit.Assertions, only: [flunk: 1]

  alias SseGateway.{Event, JSON}

  @registry SseGateway.Test.Registry

  @doc false
  def capture(%Event{} = ev) do
    with {:ok, data} <- roundtrip(ev.data),
         {:ok, topics} <- topics(ev) do
      n = System.unique_integer([:positive, :monotonic])
      id = "test-#{n}"

      published = %{
        id: id,
        topics: topics,
        event: ev.event,
        data: data,
        route: ev.route,
        key: ev.key
      }

      for pid <- Enum.uniq([self() | Process.get(:"$callers", [])]) do
        send(pid, {:sse_gateway_published, published})
      end

      deliver(published)
      {:ok, id}
    end
  end

  defp roundtrip(data) do
    {:ok, data |> JSON.encode!() |> JSON.decode!()}
  rescue
    e -> {:error, %SseGateway.Error{code: "invalid_json", message: Exception.message(e)}}
  end

  defp topics(%Event{route: nil, topics: topics}), do: {:ok, topics}

  defp topics(%Event{route: "projects/" <> kind, data: data}),
    do: SseGateway.Projects.topics_for(kind, data)

  defp topics(%Event{}), do: {:ok, []}

  defp deliver(p) do
    p.topics
    |> Enum.flat_map(&Registry.lookup(@registry, &1))
    |> Enum.uniq()
    |> Enum.each(fn {pid, {topics, format}} ->
      case format do
        :projects ->
          send(pid, {:projects, SseGateway.Stream.event_name(p.event), p.data})

        :event ->
          send(
            pid,
            {:sse_gateway, :event, %Event{id: p.id, event: p.event, data: p.data, topics: topics}}
          )
      end
    end)
  end

  @doc false
  def subscribe(topics, format) do
    unless Enum.any?(Registry.lookup(@registry, hd(topics)), fn {pid, {t, _}} ->
             pid == self() and t == topics
           end) do
      Enum.each(topics, &Registry.register(@registry, &1, {topics, format}))
    end

    :ok
  end

  @doc false
  def unsubscribe(topics) do
    Enum.each(topics, &Registry.unregister_match(@registry, &1, {topics, :_}))
  end

  # ------------------------------------------------------------ assertions

  @doc """
  Asserts that an event to `topic` (with name `event` and data `data` when
  given; `:any` matches anything) was published by this process or a task of
  it within `timeout` ms, and returns it. `data` is compared after a JSON
  round trip, so `%{uuid: id}` matches `%{"uuid" => id}`.
  """
  def assert_published(topic, event \\ :any, data \\ :any, timeout \\ 100) do
    match = fn p -> topic in p.topics and same_event?(p, event) and same_data?(p, data) end
    find!(match, timeout, String.trim("an event to #{inspect(topic)} #{describe(event, data)}"))
  end

  @doc """
  Asserts a broadcast through route `kind` of the projects module (`"project"`,
  `"task"`, …; or a full `"module/kind"`), like `assert_published/4`.
  """
  def assert_broadcast(kind, event \\ :any, payload \\ :any, timeout \\ 100) do
    route = if String.contains?(kind, "/"), do: kind, else: "projects/" <> kind
    match = fn p -> p.route == route and same_event?(p, event) and same_data?(p, payload) end
    find!(match, timeout, String.trim("a broadcast through #{route} #{describe(event, payload)}"))
  end

  @doc "Asserts that nothing was published to `topic` (within `timeout` ms)."
  def refute_published(topic, timeout \\ 0) do
    receive do
      {:sse_gateway_published, %{topics: topics} = p} ->
        if topic in topics do
          flunk("expected no event to #{inspect(topic)}, got #{inspect(p)}")
        else
          refute_published(topic, timeout)
        end
    after
      timeout -> :ok
    end
  end

  @doc "Every captured publish in the mailbox, oldest first (and removes them)."
  def published do
    receive do
      {:sse_gateway_published, p} -> [p | published()]
    after
      0 -> []
    end
  end

  defp find!(match, timeout, what) do
    deadline = System.monotonic_time(:millisecond) + timeout
    find(match, deadline, what, [])
  end

  defp find(match, deadline, what, seen) do
    left = max(deadline - System.monotonic_time(:millisecond), 0)

    receive do
      {:sse_gateway_published, p} ->
        if match.(p) do
          # Put back what did not match, in order, for later assertions.
          Enum.each(Enum.reverse(seen), &send(self(), {:sse_gateway_published, &1}))
          p
        else
          find(match, deadline, what, [p | seen])
        end
    after
      left ->
        Enum.each(Enum.reverse(seen), &send(self(), {:sse_gateway_published, &1}))
        flunk("expected #{what} to be published; published: #{inspect(Enum.reverse(seen))}")
    end
  end

  defp same_event?(_p, :any), do: true
  defp same_event?(p, event), do: p.event == to_string(event)

  defp same_data?(_p, :any), do: true
  defp same_data?(p, data), do: p.data == data |> JSON.encode!() |> JSON.decode!()

  defp describe(event, data) do
    [
      if(event != :any, do: "named #{inspect(event)}"),
      if(data != :any, do: "with data #{inspect(data)}")
    ]
    |> Enum.reject(&is_nil/1)
    |> Enum.join(" ")
  end
end
